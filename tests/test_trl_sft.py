"""TRL's SFTTrainer trains a tiny VIPA-VLA on image + chat examples through VipaProcessor (stage-2 setup):
only assistant tokens carry labels, the loss goes down, and the frozen encoders do not move."""

from __future__ import annotations

import torch
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from modeling_vipa.configuration_vipa import VipaConfig, internvl_tiny_config  # noqa: E402
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration, set_trainable  # noqa: E402

ANSWERS = [f"The hand is left and down of the cup, 0.{i + 1} m." for i in range(4)]


def test_sft_trainer_assistant_only_loss_decreases(tmp_path) -> None:
    import tests.tiny_assets as tiny_assets

    processor = tiny_assets.build_tiny_processor()
    ivl = internvl_tiny_config(image_token_id=processor.image_token_id)
    ivl.text_config.vocab_size = len(processor.tokenizer)
    torch.manual_seed(0)
    model = VipaForConditionalGeneration(VipaConfig.tiny(internvl_config=ivl))
    set_trainable(model, 2)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    rows = [
        {
            "images": [tiny_assets.make_image(40, 50, seed=i)],
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "Where is the hand?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        }
        for i, answer in enumerate(ANSWERS)
    ]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # TRL's default is bf16; float32 on CPU, as every trainer of the package chooses
        assistant_only_loss=True,
        gradient_checkpointing=False,
        max_length=None,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor
    )

    batch = trainer.data_collator([dict(r) for r in rows[:2]])
    for key in ("pixel_values", "spatial_pixel_values", "spatial_frame_mask"):
        assert key in batch, key
    for i in range(2):
        labelled = batch["input_ids"][i][batch["labels"][i] != -100]
        assert processor.tokenizer.decode(labelled) == ANSWERS[i] + "<|im_end|>"

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name

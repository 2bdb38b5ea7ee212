"""The embedded CPU default (`make demo`): stand-in models for the pretrained parts and the main job.

Users of real weights never import this package; nothing in `modeling_vipa`, `processing_vipa`,
`hand3d_dataset`, `training` or `evaluation` imports it (a test checks). `python -m cpu_demo` runs the main job.
"""

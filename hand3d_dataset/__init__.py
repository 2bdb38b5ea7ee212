"""hand3d_dataset"""

"""Views of images: the multi-crop augmentation and its batched colour ops (float and uint8)."""

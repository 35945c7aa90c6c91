"""Backbones: vision-language models built from spec strings (see factory.create_backbone)."""

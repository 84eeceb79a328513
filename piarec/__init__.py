"""piarec: batch recommendations with Multi-VAE and Personalized Item Alignment."""

__version__ = "0.1.0"

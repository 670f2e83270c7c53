"""hf-taujp: task arithmetic with linearized fine-tuning and the τJp regularizer."""

__version__ = "0.1.0"

"""Import transformer checkpoints (config.json + safetensors + tokenizer.json) without PyTorch.

Host only. Weights are read with safetensors' numpy API into Keras 3 / TensorFlow graphs.
"""

"""Deployment: segmentation into stages, the YUV input patch, TorchScript and ONNX export."""

"""Deployment: segmentation into stages, the YUV input patch, TorchScript and ONNX export."""

from hq_lightning.deploy.manifest import load_manifest, run_manifest, validate_manifest
from hq_lightning.deploy.onnx_export import export_onnx, run_onnx
from hq_lightning.deploy.pipeline import Deployment, deploy_converted
from hq_lightning.deploy.segment import (
    auto_split_points,
    check_float_boundary,
    run_stages,
    split_stages,
)
from hq_lightning.deploy.torchscript_export import export_torchscript
from hq_lightning.deploy.yuv_patch import input_stub_names, patch_yuv_input

__all__ = [
    "Deployment",
    "auto_split_points",
    "check_float_boundary",
    "deploy_converted",
    "load_manifest",
    "run_manifest",
    "validate_manifest",
    "export_onnx",
    "export_torchscript",
    "run_onnx",
    "input_stub_names",
    "patch_yuv_input",
    "run_stages",
    "split_stages",
]

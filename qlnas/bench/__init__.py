"""Benchmarks of the models and the data pipeline: `qlnas bench train-step|loader`.

- `train_step`: train-step and inference speed of the Table 1 models against resnet50, each
  model in its own processes (`make bench`, `bench/train_step.py`, `bench/gpu.sh`);
- `loader`: torchvision vs stock FFCV vs our decoders on the same JPEGs (`bench/loader.py`);
- `metrics`: what they measure besides time (peak memory, aten-op traffic, copy bandwidth,
  the machine); `report`: ratios, printed tables, targets and the PNG plot;
- `photos`: the ImageNet-like JPEG tree the loader and writer benchmarks (and the data tests)
  read.

The models (`qlnas.models`) and the pipeline (`qlnas.data`) never import this package; the
FFCV loaders that the loader benchmark times come from `qlnas.data.compare`.
"""

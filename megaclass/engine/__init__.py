"""Training on DeepSpeed: config (`config`), process groups (`distributed`), the data-parallel and
pipeline trainers (`trainer`, `pipeline`), checkpoints, logging, and the seed's experiment.
Modules are imported where used: importing the package loads neither DeepSpeed nor timm."""

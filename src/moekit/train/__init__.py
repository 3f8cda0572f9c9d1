"""Training small causal LMs (the bundled models) in standard Hugging Face architectures."""

from moekit.train.lm_trainer import (
    PRESETS,
    TrainConfig,
    TrainHistory,
    count_parameters,
    lr_at,
    make_readable,
    model_config,
    pack_windows,
    plot_loss,
    save_checkpoint,
    train_lm,
)

__all__ = ["PRESETS", "TrainConfig", "TrainHistory", "count_parameters", "lr_at", "make_readable", "model_config",
           "pack_windows", "plot_loss", "save_checkpoint", "train_lm"]

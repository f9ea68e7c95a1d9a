"""Training a fit's model: the loop, its checkpoints and resume states, learning-rate schedules.

config.py       TrainConfig: the settings of one fit
schedules.py    learning-rate schedules (constant, cosine, the IWAE paper's stages)
checkpoints.py  checkpoint keys, atomic saves, safe loads, resume states
loop.py         ``train_model``: train or load one model; the objective comes from estimators
"""
from .checkpoints import CheckpointError, checkpoint_key, resume_path
from .config import TrainConfig
from .loop import TrainingDivergedError, TrainResult, build_model, initial_model, train_model
from .schedules import SCHEDULES, iwae_stage

__all__ = ["SCHEDULES", "CheckpointError", "TrainConfig", "TrainResult", "TrainingDivergedError", "build_model",
           "checkpoint_key", "initial_model", "iwae_stage", "resume_path", "train_model"]

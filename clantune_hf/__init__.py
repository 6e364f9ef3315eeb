"""Clan Training for Hugging Face `transformers`: hyperparameter schedules found at the cost of one DDP run."""

from .clan_config import ClanConfig
from .clan_trainer import ClanTrainer
from .replay import ScheduleReplayCallback

__all__ = ["ClanConfig", "ClanTrainer", "ScheduleReplayCallback"]
__version__ = "0.1.0"

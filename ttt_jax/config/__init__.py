"""The config tree (``schema``) and its loading from YAML and ``--set`` (``loading``).

Import names from here: ``from ttt_jax.config import Config, load_config``.
"""

from ttt_jax.config.loading import (LEGACY_MODEL_KEYS, config_hash, describe,
                                    describe_section, flatten, from_dict, load_config,
                                    model_from_dict, parse_override, save_config, to_dict,
                                    to_yaml, upgrade_legacy)
from ttt_jax.config.schema import (SLOTS, CheckpointConfig, Config, DataConfig, EvalConfig,
                                   LoggingConfig, LoRAConfig, MeshConfig, ModelConfig,
                                   OptimConfig,
                                   Section, TrainConfig, check_choice, check_non_negative,
                                   check_positive)
from ttt_jax.errors import ConfigError

__all__ = ["LEGACY_MODEL_KEYS", "SLOTS", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "EvalConfig", "LoggingConfig", "LoRAConfig", "MeshConfig", "ModelConfig",
           "OptimConfig", "Section", "TrainConfig", "check_choice", "check_non_negative",
           "check_positive", "config_hash", "describe", "describe_section", "flatten",
           "from_dict", "load_config", "model_from_dict", "parse_override", "save_config",
           "to_dict", "to_yaml", "upgrade_legacy"]

"""Configuration: named presets (presets.yaml) validated by pydantic, overridable by CHAT_* variables."""

from config.presets import DevicePreset, ModelPreset, Presets, load_presets
from config.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "DevicePreset", "ModelPreset", "Presets", "Settings", "load_presets", "load_settings"]

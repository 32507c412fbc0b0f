"""What a CLI command gets: the config and the runtime, both built only when first used."""

from __future__ import annotations

import functools

from agent import config as config_module
from agent.config import Config
from agent.runtime import Runtime


class CliContext:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path

    @functools.cached_property
    def config(self) -> Config:
        return config_module.load(self.config_path)

    @functools.cached_property
    def runtime(self) -> Runtime:
        return Runtime(self.config, interactive=True)

    def close(self) -> None:
        if "runtime" in self.__dict__:
            self.runtime.close()

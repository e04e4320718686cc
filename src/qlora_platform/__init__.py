"""qlora-platform: raw domain data to a fine-tuned, evaluated, served and exported LLM with QLoRA."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qlora-platform")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"

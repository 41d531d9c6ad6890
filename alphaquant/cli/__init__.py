"""The `alphaquant` command line application, apart from the library: model loading
(:mod:`.models`), evaluation (:mod:`.evaluation`), checkpoint folders (:mod:`.checkpoint_folder`),
the report picture (:mod:`.report_chart`), presets (:mod:`.presets`) and the commands (:mod:`.main`)."""
from .main import main

__all__ = ["main"]

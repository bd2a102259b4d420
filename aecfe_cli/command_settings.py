"""The settings and session a command runs with: global options, config resolution (defaults < YAML < flags,
or the workdir's saved config.yaml) and the session of a working command. Knows nothing of Typer."""

import os
from pathlib import Path
from typing import Optional

from .errors import UserError

DEFAULT_WORKDIR = "aecfe-work"


class Options:
    """Global options, shared by every command through the Typer context."""

    def __init__(self, workdir, config, device, seed, quiet, debug, preset=None):
        self.workdir_given = workdir is not None
        self.workdir = Path(workdir or DEFAULT_WORKDIR)
        self.config = config
        self.device = device
        self.seed = seed
        self.quiet = quiet
        self.debug = debug
        self.preset = preset


def resolve_config(options: Options, sections: Optional[dict] = None):
    """Defaults < YAML (--config, else ./aecfe.yaml) < flags; returns the resolved Config."""
    from .config import default_config_path, load_config

    return with_flags(load_config(options.config or default_config_path(), options.preset), options, sections)


def with_flags(config, options: Options, sections: Optional[dict] = None):
    from .config import apply_overrides

    apply_overrides(config, "runtime", device=options.device, seed=options.seed)
    for section, values in (sections or {}).items():
        apply_overrides(config, section, **values)
    return config


def open_session(options: Options, sections: Optional[dict] = None, force: bool = False, stages=(), strict=None):
    """Everything a working command needs. The command saves its config into the workdir
    (``Session.save_config``) once its inputs passed its own checks."""
    from .config import check_key_combinations
    from .evaluate import check_settings as check_evaluate_settings
    from .pipeline import Session, resolve_device
    from .reporting import Reporter
    from .workdir import Workdir

    reporter = Reporter(quiet=options.quiet)
    config, _ = workdir_config(options, reporter, sections)
    if strict is not None:
        config.runtime.strict = strict
    # Classifier settings that cannot work (a misspelt choice, knn with class weights) and keys that do nothing
    # together fail here, before any work (every other section's choices were checked as the config was read).
    check_evaluate_settings(config.evaluate)
    check_key_combinations(config)
    device = resolve_device(config.runtime.device)
    set_threads(config.runtime.threads)
    workdir = Workdir(options.workdir)
    workdir.prepare()
    return Session(workdir, config, device, reporter,
                   force=frozenset(stages) if force else frozenset(), strict=config.runtime.strict)


def set_threads(threads: int) -> None:
    """``threads`` > 0, else OMP_NUM_THREADS when the environment sets it (as torch itself would: a job
    scheduler or parallel test runner sharing the cores says so there), else every core."""
    import torch

    from_environment = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(threads or (int(from_environment) if from_environment.isdigit() else 0)
                          or os.cpu_count() or 1)


def workdir_config(options: Options, reporter, sections: Optional[dict] = None) -> tuple:
    """The settings of a command, and where they came from: --config FILE, else ./aecfe.yaml, else the
    workdir's own config.yaml (the settings of the command that last wrote there, so a command after
    `aecfe demo` in its workdir reuses the demo's detector and model instead of retraining both with the
    built-in defaults), else the built-in defaults; flags and ``sections`` on top."""
    from .config import default_config_path, load_config

    chosen = options.config or default_config_path()
    saved = options.workdir / "config.yaml"
    if chosen is not None or not saved.is_file():
        return resolve_config(options, sections), str(chosen or "built-in defaults")
    try:
        config = load_config(saved, options.preset)
    except UserError as exc:  # written by another aecfe version, say
        reporter.warn(f"{exc}; using the built-in defaults instead")
        return resolve_config(options, sections), "built-in defaults"
    return with_flags(config, options, sections), str(saved)  # a refused flag is the user's, not the file's

"""Options that ``edgetl train`` and ``edgetl eval`` take for cross-validation and per-domain metrics.

``edgetl train DATA --cv K [--group-by COLUMN|re:REGEX] [--refit] --out OUT`` (``edgetl.cv``) and
``edgetl eval RUN [DATA] --by COLUMN`` (``edgetl.adapt.evaluate_by``). The decorators add the
options; the helpers are what the commands call. Nothing heavy is imported here.

Wiring in ``edgetl/commands/train.py``::

    @cv_options                       # on train, below the other options
    ...
    cv_args = pop_cv_options(options)        # after require(...), before options.pop("task")
    ...
        cfg = resolve_config(cli, config_file, resume=resume and not cv_args["cv"], world_size=world)
        if run_cv_if_asked(cfg, **cv_args, overwrite=overwrite, quiet=quiet):
            return

    @by_option                        # on eval_cmd; its function takes ``by``
    ...
    if run_eval_by_if_asked(run, data, by, split=split, out=out, overwrite=overwrite, as_json=as_json,
                            device=device, batch_size=batch_size, workers=num_workers):
        return
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..runtime.errors import EdgetlError

CV_KEYS = ("cv", "group_by", "refit")


def cv_options(f):
    """``--cv K``, ``--group-by COLUMN|re:REGEX``, ``--refit/--no-refit``."""
    f = click.option("--refit/--no-refit", default=None,
                     help="--cv: after the folds, also train on all the data into OUT/refit. [default: off]")(f)
    f = click.option("--group-by", "group_by", metavar="COLUMN|re:REGEX",
                     help="--cv: keep groups in one fold (near-duplicates, crops of one object): a column of the "
                          "DATA CSV, or re:REGEX on each image's path (its first group names the group).")(f)
    f = click.option("--cv", "cv", type=int, metavar="K",
                     help="K-fold cross-validation of this recipe: OUT/fold-1..K (each a run), OUT/cv.json with "
                          "per-fold and mean ± std accuracy and macro-F1. Re-running resumes.")(f)
    return f


def pop_cv_options(options: dict[str, Any]) -> dict[str, Any]:
    """Take ``cv``, ``group_by``, ``refit`` out of the command's options (they are not config keys)."""
    args = {k: options.pop(k, None) for k in CV_KEYS}
    given = [k for k in CV_KEYS if args[k] not in (None, False)]
    if given and options.get("task") == "detect":
        raise EdgetlError(f"--{given[0].replace('_', '-')} is not available with --task detect",
                          hint="cross-validation trains image classifiers; drop it or the --task detect")
    if given and options.get("nproc") is not None:
        raise EdgetlError(f"--{given[0].replace('_', '-')} with --nproc: the folds train one after the other in one "
                          "process", hint="drop --nproc (or run each fold's CSV with --nproc yourself)")
    return args


def run_cv_if_asked(cfg, cv: int | None, group_by: str | None, refit: bool | None, *, overwrite: bool = False,
                    quiet: bool = False) -> bool:
    """Run the cross-validation when ``--cv`` is given (True: the command is done); refuse
    ``--group-by``/``--refit`` without it."""
    if cv is None:
        extra = "--group-by" if group_by is not None else "--refit" if refit else None
        if extra:
            raise EdgetlError(f"{extra} only applies to cross-validation", hint="add --cv K (e.g. --cv 5), or drop it")
        return False
    from ..cv import cross_validate
    from ..train import Reporter

    cross_validate(cfg, cv, group_by, bool(refit), cfg.out, overwrite=overwrite, reporter=Reporter(quiet=quiet))
    return True


def by_option(f):
    """``--by COLUMN`` of ``edgetl eval``."""
    return click.option("--by", "by", metavar="COLUMN",
                        help="Metrics per value of this column of DATA's CSV (without DATA: of the CSV the run was "
                             "trained from), side by side, e.g. --by cell_type.")(f)


def run_eval_by_if_asked(run: Path, data: Path | None, by: str | None, *, split: str = "test", out: Path | None = None,
                         overwrite: bool = False, as_json: bool = False, device: str = "auto",
                         batch_size: int | None = None, workers: int | None = None) -> bool:
    """``edgetl eval --by COLUMN``: the table (or JSON), and ``OUT/metrics.json`` with ``--out``.
    Returns False when ``--by`` is not given."""
    if by is None:
        return False
    if not by.strip():
        raise EdgetlError("--by is empty", hint="name a column of the CSV, e.g. --by cell_type")
    from ..adapt import evaluate_by, format_by
    from ..fsutil import atomic_output_dir, check_output_dir
    from ..train import Reporter

    if out:
        check_output_dir(out, overwrite)
    res = evaluate_by(run, data, by, split=split, device=device, batch_size=batch_size, workers=workers,
                      reporter=Reporter(quiet=as_json))
    click.echo(json.dumps(res, indent=1) if as_json else format_by(res))
    if out:
        with atomic_output_dir(out, overwrite=overwrite) as d:
            (d / "metrics.json").write_text(json.dumps(res, indent=1) + "\n")
        if not as_json:
            click.echo(f"wrote {out}/metrics.json")
    return True

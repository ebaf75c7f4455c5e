"""Audit a checkpoint: what its symmetries say about its weights and its training.

* :mod:`~symtools.audit.loading` — safe loading (weights only / safetensors), corruption and nan/inf checks, key
  and shape validation, VGG architecture inference (:func:`infer_vgg`);
* :mod:`~symtools.audit.charges` — the charge of every symmetry group (generated charge densities), distributions;
* :mod:`~symtools.audit.compare` — vs init, vs the optimizer's exact laws (:func:`predicted_charges`), flags;
* :mod:`~symtools.audit.records` — what a training run recorded (lr per step, per-group charges and drives);
* :mod:`~symtools.audit.core` — :func:`audit_model`, the whole audit as one JSON-ready dict;
* :mod:`~symtools.audit.report` — terminal table, JSON, HTML report with plots (atomic writes).

The command line is ``symtools audit`` (docs/commands/audit.md).
"""

from symtools.audit.charges import distribution, group_charges
from symtools.audit.compare import Hyper, Prediction, Snapshot, hyper_from_optimizer, predicted_charges
from symtools.audit.core import audit_model
from symtools.audit.loading import (Checkpoint, VGGArch, build_model_for, describe_vgg, fit_state_dict, infer_vgg,
                                    load_checkpoint_file)
from symtools.audit.records import RecordedRun
from symtools.audit.report import render_table, write_html, write_json

__all__ = ["audit_model", "load_checkpoint_file", "infer_vgg", "describe_vgg", "build_model_for", "fit_state_dict",
           "Checkpoint", "VGGArch", "group_charges", "distribution", "Hyper", "Prediction", "Snapshot",
           "hyper_from_optimizer", "predicted_charges", "RecordedRun", "render_table", "write_json", "write_html"]

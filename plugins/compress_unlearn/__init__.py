"""Machine unlearning on the shared training loop: GA, GradDiff, NPO, SimNPO, DiPO, with TOFU's metrics.

The methods are in :mod:`compress_unlearn.method` (losses in :mod:`compress_unlearn.losses`),
the ``qa`` data source for TOFU-style records in :mod:`compress_unlearn.data`, and the metrics
(forget quality, model utility, ROUGE, extraction strength, memorization, privacy leak) in
:mod:`compress_unlearn.metrics`. DMM (datamodel matching, for image classifiers) is in
:mod:`compress_unlearn.dmm` with its TRAK datamodel in :mod:`compress_unlearn.trak`, and its
metric KLOM in :mod:`compress_unlearn.klom`.
"""

from compress import hookimpl
from compress_unlearn.data import QASource
from compress_unlearn.dmm import DMM
from compress_unlearn.klom import KLOM
from compress_unlearn.method import METHODS
from compress_unlearn.metrics import METRICS
from compress_unlearn.uoe import UOE

compress_api = ">=2,<3"


@hookimpl
def compress_register_methods(register):
    for method in METHODS:
        register(method)
    register(UOE)
    register(DMM)


@hookimpl
def compress_register_metrics(register):
    for metric in METRICS:
        register(metric)
    register(KLOM)


@hookimpl
def compress_register_data_sources(register):
    register(QASource())

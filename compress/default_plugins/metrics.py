from compress import hookimpl
from compress.evaluate import BUILTIN_METRICS
from compress.images import IMAGE_METRICS
from compress.lm_eval import LMEval


@hookimpl
def compress_register_metrics(register):
    for metric in BUILTIN_METRICS + IMAGE_METRICS:
        register(metric)
    register(LMEval)

"""KL-guided statistical pre-calibration (data-free, weight-adaptive PTQ with outlier separation)."""

from compress import hookimpl
from compress_kl_ptq.method import KLPTQ, kl_ptq_candidates

compress_api = ">=2,<3"


@hookimpl
def compress_register_methods(register):
    register(KLPTQ)


@hookimpl
def compress_layer_candidates(name, module, request):
    return kl_ptq_candidates(name, module, request)

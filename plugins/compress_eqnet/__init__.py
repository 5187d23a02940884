"""EQ-Net: an elastic quantization supernet, its accuracy predictor and a genetic search."""

from compress import hookimpl
from compress_eqnet.candidates import supernet_candidates
from compress_eqnet.method import EQNet
from compress_eqnet.search import EQNetSearch

compress_api = ">=2,<3"


@hookimpl
def compress_register_methods(register):
    register(EQNet)
    register(EQNetSearch)


@hookimpl
def compress_layer_candidates(context, name, module, request):
    return supernet_candidates(context, name, module, request)

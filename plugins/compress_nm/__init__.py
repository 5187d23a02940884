"""N:M and unstructured sparsity: magnitude, Wanda, SparseGPT (one-shot) and SR-STE (trained)."""

from compress import hookimpl
from compress_nm.candidates import magnitude_candidates
from compress_nm.commands import add_commands
from compress_nm.magnitude import Magnitude
from compress_nm.sparsegpt import SparseGPT
from compress_nm.srste_method import SRSTE
from compress_nm.wanda import Wanda

compress_api = ">=2,<3"


@hookimpl
def compress_register_methods(register):
    for method in (Magnitude, Wanda, SparseGPT, SRSTE):
        register(method)


@hookimpl
def compress_register_commands(cli):
    add_commands(cli)


@hookimpl
def compress_layer_candidates(module, request):
    return magnitude_candidates(module, request)

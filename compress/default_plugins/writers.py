from compress import hookimpl
from compress.checkpoint.bitsandbytes import BitsAndBytesWriter
from compress.checkpoint.compressed_tensors import CompressedTensorsWriter
from compress.checkpoint.output import DenseWriter


@hookimpl
def compress_register_writers(register):
    register(DenseWriter())
    register(CompressedTensorsWriter())
    register(BitsAndBytesWriter())

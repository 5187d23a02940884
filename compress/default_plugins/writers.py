from compress import hookimpl
from compress.checkpoint.bitsandbytes import BitsAndBytesWriter
from compress.checkpoint.output import DenseWriter


@hookimpl
def compress_register_writers(register):
    register(DenseWriter())
    register(BitsAndBytesWriter())

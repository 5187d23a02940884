from compress import hookimpl
from compress.data import TextFileSource


@hookimpl
def compress_register_data_sources(register):
    register(TextFileSource())

from compress import hookimpl
from compress.checkpoint.builtin import BuiltinLoader
from compress.checkpoint.loaders import DirectoryLoader, GGUFLoader, HubLoader


@hookimpl
def compress_register_loaders(register):
    register(BuiltinLoader())
    register(GGUFLoader())
    register(DirectoryLoader())
    register(HubLoader())

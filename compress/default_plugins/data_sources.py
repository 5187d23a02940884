from compress import hookimpl
from compress.data import ChatSource, JsonLinesSource, TextFileSource
from compress.hub_data import HubDataSource
from compress.images import ImageFolderSource


@hookimpl
def compress_register_data_sources(register):
    register(TextFileSource())
    register(JsonLinesSource())
    register(ChatSource())
    register(ImageFolderSource())
    register(HubDataSource())

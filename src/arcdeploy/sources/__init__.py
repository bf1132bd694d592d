"""Where models come from: one class per kind of source, each in its own module and listed in
:mod:`.registry`: arcface_torch checkpoints (:mod:`.checkpoint`) and foreign ArcFace-family ONNX
files (:mod:`.onnx_model`, with :mod:`.onnx_graph` reading the graph). Each becomes an export
folder, self-checked by :mod:`.verify`; :mod:`arcdeploy.exporter` is the stage that picks one.

Adding a source is one module defining a :class:`~.base.ModelSource` subclass named ``SOURCE``
and one line in ``SOURCE_MODULES``."""

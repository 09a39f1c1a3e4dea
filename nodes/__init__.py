"""ComfyUI glue for the MEPG pack: V3 node classes that unpack inputs, call mepg_core, wrap outputs."""

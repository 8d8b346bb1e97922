"""Training objectives, one file each; `build_method(name, args)` looks them up by name."""

from .base import DataInfo, LossOutput, Method, build_method, method_names, register_method

__all__ = ["DataInfo", "LossOutput", "Method", "build_method", "method_names", "register_method"]

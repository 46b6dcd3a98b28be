"""Static sparse training: a fixed random mask from the density distribution, never rewired."""
from .base import Method, register


@register
class Static(Method):
    name = "static"
    dynamic = False

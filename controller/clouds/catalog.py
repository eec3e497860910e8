"""The clouds fedsky links, one plug-in each: the only place that lists them."""

from __future__ import annotations

from collections.abc import Mapping

from fedsky.controller.clouds.aws.plugin import AWS_PLUGIN
from fedsky.controller.clouds.gcp.plugin import GCP_PLUGIN
from fedsky.controller.clouds.plugin import CloudPlugin

# In the order commands and messages list them.
_PLUGINS: tuple[CloudPlugin, ...] = (AWS_PLUGIN, GCP_PLUGIN)

CLOUD_PLUGINS: Mapping[str, CloudPlugin] = {plugin.name: plugin for plugin in _PLUGINS}

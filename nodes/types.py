"""The pack's custom socket types. Each arrow between MEPG nodes is one of these."""

from comfy_api.latest import io

# Value: mepg_core.layout.Layout
LayoutType = io.Custom("MEPG_LAYOUT")
# Value: mepg_core.regions.RegionSet
RegionsType = io.Custom("MEPG_REGIONS")

# Value: nodes.expert_nodes.Portfolio (which files, names, tags; weights are read when patching)
ExpertStackType = io.Custom("MEPG_EXPERT_STACK")

CATEGORY = "MEPG"

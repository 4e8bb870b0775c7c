"""The mitmproxy script that loads the Sluice policy addon:

    mitmdump -s sidecar/mitm_addon.py --set sluice_app=billing --set sluice_policies=...

mitmproxy executes a script as a module outside any package (and dataclasses cannot be
defined in such a module), so the addon lives in `sidecar/mitm/addon.py` and this file
only hands mitmproxy an instance of it. The options are listed in docs/operations.md.
"""

from __future__ import annotations

from sidecar.mitm.addon import SluiceAddon

addons = [SluiceAddon()]

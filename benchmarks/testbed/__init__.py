"""A multi-host testbed on one machine: network namespaces joined by delaying relays.

See docs/testbed.md. `topology` plans hosts and links, `netns` builds them, `relay` delays the
links, `measure` checks the delays.
"""

"""The panel: pure drawing of every screen from a state snapshot (``screens``), the observer that
puts them on a ``hw.Display`` (``observer``), and the button and LED (``controls``).

May import the shared ground (``agent.config``, ``agent.state``, ``agent.errors``) and ``hw``.
"""

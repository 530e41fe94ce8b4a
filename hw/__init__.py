"""Hardware abstraction layer: GPIO, displays and sensors, real and fake. Never imports agent."""

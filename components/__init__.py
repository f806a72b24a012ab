"""The stages of the Seed1.5-VL pipeline and the code they share (`components.common`)."""

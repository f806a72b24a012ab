"""Pipeline wiring: which components run, in what order, fed by which outputs."""

"""An example kernel plugin; copy this directory to start your own."""

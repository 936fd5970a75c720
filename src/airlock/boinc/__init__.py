"""The BOINC project face of the gateway (see DESIGN.md): so far, code signing of app files."""

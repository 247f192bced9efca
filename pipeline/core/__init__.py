"""The foundations every layer uses: geometry, files written atomically, fault points."""

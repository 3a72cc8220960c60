"""Exit statuses of the long-running commands (sysexits.h); EX_CONFIG, a
bad config, is config.py's."""

EX_NOUSER = 67        # the --user given does not exist
EX_UNAVAILABLE = 69   # a listen address cannot be used; a service manager may retry later
EX_SOFTWARE = 70      # workers keep dying: something is wrong with us

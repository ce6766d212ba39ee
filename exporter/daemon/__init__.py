"""The long-running exporter: scheduler, scan pipeline and the snapshot its readers share."""

"""`scopevid bench` and `scopevid calibrate` internals: run plans (runs), figures, the markdown
report, TeaCache coefficient fitting and the threshold search. The commands live in scopevid/commands."""

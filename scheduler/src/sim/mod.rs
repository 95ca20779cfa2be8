//! The trace-driven simulator behind `gangway sim`: the production engine under a discrete-event clock.

"""The agent's update state machine: the (state, event) table, the record, the flow, the restore.

- table.py: FLOW, the (state, event) -> state rows, and the state-loop guard;
- record.py: the UpdateRecord persisted in update.json before every transition;
- flow.py: the update flow, one step per in-flight state (STEPS), driven by the table;
- restore.py: crash recovery, one handler per persisted state (RESTORE).

The states themselves are `agent.protocol.AgentState`, shared with the controller's simulator.
"""

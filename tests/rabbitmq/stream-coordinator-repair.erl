%% An expression for `rabbitmqctl -n rabbit@localhost eval` (on standard input): repairs the
%% machine node's stream coordinator after test nodes left its cluster.
%%
%% The stream coordinator is a Raft cluster over every node of the RabbitMQ cluster: a node that
%% joins (a cluster test's) becomes a member within 30 s or so. Members that stopped before the
%% coordinator took them out can leave the machine's node a minority of the coordinator, unable
%% to commit anything ("cluster_change_not_permitted"): it then refuses every new stream
%% ("coordinator_unavailable"), across restarts. So when the node is alone in its cluster, the
%% coordinator's other members are removed; if that cannot be done (3.10 has no command to
%% shrink the coordinator by force), its server is deleted, and the next stream declared starts
%% a new coordinator on this node alone (the streams it knew, if any, are lost with it: on a
%% test machine, test streams). Prints `healthy`, `{removed, Members}`, `{repaired, ...}`,
%% `clustered` or `{no_coordinator, ...}`.
case rabbit_mnesia:cluster_nodes(all) =:= [node()] of
    false -> clustered;
    true ->
        Me = {rabbit_stream_coordinator, node()},
        Stale = case ra:members(Me, 10000) of
                    {ok, Members, _Leader} -> [M || {_, N} = M <- Members, N =/= node()];
                    {timeout, _} -> timeout;
                    Other -> {no_coordinator, Other}
                end,
        Removed = fun(M) -> element(1, catch ra:remove_member(Me, M, 10000)) =:= ok end,
        case Stale of
            [] -> healthy;
            {no_coordinator, _} -> Stale;
            _ when is_list(Stale) ->
                case lists:all(Removed, Stale) andalso element(1, ra:members(Me, 10000)) =:= ok of
                    true -> {removed, Stale};
                    false ->
                        ok = ra:force_delete_server(coordination, Me),
                        {repaired, {stale_members, Stale}}
                end;
            timeout ->
                ok = ra:force_delete_server(coordination, Me),
                {repaired, no_leader}
        end
end.

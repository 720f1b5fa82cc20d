import sys
p=sys.argv[1]
s=open(p).read()
old="""                if (!kRowRun || mine_in_k)
                    load_streaming<kChunkBytes, true>(
                        st.w[i][h], qweight + (static_cast<u32>(row) * row_bytes32 + static_cast<u32>(k_byte)));"""
new="""                if (kRowRun) {
                    if (mine_in_k)
                    load_streaming<kChunkBytes, true>(
                        st.w[i][h], qweight + (static_cast<u32>(row) * row_bytes32 + static_cast<u32>(k_byte)));
                } else {
                    // EXPERIMENT: tiled weights [N/16][steps][2][32][kChunkBytes]
                    const u32 tile = static_cast<u32>(min(b * kTiles + i, (n_rows - 1) / 16));
                    const u32 ch = static_cast<u32>(step_in_k ? chunk : 0);
                    load_streaming<kChunkBytes, false>(
                        st.w[i][h], qweight + ((tile * static_cast<u32>(steps) + ch) * (64u * kChunkBytes)
                                               + static_cast<u32>(h * 32 + lane) * kChunkBytes));
                }"""
assert old in s
s=s.replace(old,new)
open(p,'w').write(s)
